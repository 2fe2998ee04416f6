"""The page's layout: the Generate tab (UI only, no events).

Its widgets come back as dataclasses of named fields; a concept row's widgets are also reachable as lists,
one per row (``GenerateTab.row_names`` ...), which is how the handlers of ``webapp/page.py`` read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from spectral_diffusion.formats import EXPORT_FORMATS
from spectral_diffusion.generation.request import DEFAULTS, REGIONAL_MODES
from spectral_diffusion.generation.schedulers import SCHEDULERS
from webapp.drawings import LAYOUT_WIDGET
from webapp.forms import CONCEPT_ROWS, LAYOUT_MODES, NO_LAYOUT, default_box

REGIONAL_NOTE = (
    "Regional composition draws each concept only inside its box: the model runs once per box with only "
    "that box's concept on and that box's prompt (a preset gives each box its concept's clause of the "
    "prompt, plus the scene set off by a comma: '<a> on the left and <b> on the right, in a park'), and "
    "the boxes are blended. It uses the concepts' live slots (the app never bakes them into "
    "the weights). Downloaded and exported LoRAs stay global: a LoRA cannot be confined to a box."
)

REGIONAL_MODE_LABEL = (
    "How a layout is drawn: passes = one model pass per box (the default, best shapes); "
    "routed = one pass for all boxes (faster, cleaner between boxes, weaker shapes)"
)


@dataclass
class ConceptRow:
    name: gr.Dropdown
    strength: gr.Slider
    box_row: gr.Row  # shown for a custom layout only
    box: list[gr.Number]  # x0, y0, x1, y1
    region_prompt: gr.Textbox


@dataclass
class GenerateSettings:
    """The generation settings after the concepts (named as the generate endpoint's parameters)."""

    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Number
    height: gr.Number
    num_images: gr.Slider
    scheduler: gr.Dropdown


@dataclass
class Results:
    """The result column: the images, what they were made with, the layout pictures, the fused download."""

    gallery: gr.Gallery
    info: gr.Markdown
    use_settings: gr.Button  # the selected image's stored settings into the form
    layout_picture: gr.Image
    overlay: gr.Image
    fused_format: gr.Radio
    fused_button: gr.Button
    fused_files: gr.File


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    prompt_cursor: gr.Number  # never shown: the prompt's cursor when a concept card is clicked (set in JS)
    generate_button: gr.Button
    cards: gr.Gallery
    rows: list[ConceptRow]
    concepts: gr.Textbox
    layout_mode: gr.Radio
    layout_text: gr.Textbox
    regional_mode: gr.Radio
    settings: GenerateSettings
    settings_file: gr.File
    settings_message: gr.Markdown
    results: Results

    @property
    def row_names(self) -> list[gr.Dropdown]:
        return [row.name for row in self.rows]

    @property
    def row_strengths(self) -> list[gr.Slider]:
        return [row.strength for row in self.rows]

    @property
    def row_boxes(self) -> list[list[gr.Number]]:
        return [row.box for row in self.rows]

    @property
    def region_prompts(self) -> list[gr.Textbox]:
        return [row.region_prompt for row in self.rows]

    @property
    def box_rows(self) -> list[gr.Row]:
        return [row.box_row for row in self.rows]

    def request(self) -> dict[str, gr.components.Component]:
        """The generate endpoint's widgets by parameter name, in its order."""
        return {
            "prompt": self.prompt,
            "concepts": self.concepts,
            **vars(self.settings),
            "layout": self.layout_text,
            "regional_mode": self.regional_mode,
        }


def _concept_row(index: int) -> ConceptRow:
    with gr.Row(equal_height=True):
        name = gr.Dropdown(
            choices=[], label=f"Concept {index + 1}", scale=2, allow_custom_value=True, elem_id=f"concept-{index}"
        )
        strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", scale=3, elem_id=f"strength-{index}")
    with gr.Row(visible=False, equal_height=True) as box_row:
        box = [
            gr.Number(
                value=value, minimum=0, maximum=1, step=0.05, label=label, min_width=60, elem_id=f"box-{index}-{label}"
            )
            for value, label in zip(default_box(index), ("x0", "y0", "x1", "y1"), strict=True)
        ]
        region_prompt = gr.Textbox(label="Region prompt (empty: the prompt)", scale=3, elem_id=f"region-{index}")
    return ConceptRow(name=name, strength=strength, box_row=box_row, box=box, region_prompt=region_prompt)


def _generate_settings() -> GenerateSettings:
    negative = gr.Textbox(label="Negative prompt", elem_id="generate-negative")
    with gr.Row():
        seed = gr.Number(value=DEFAULTS.seed, precision=0, label="Seed (-1 = random)", elem_id="seed")
        steps = gr.Slider(1, 100, value=DEFAULTS.steps, step=1, label="Steps", elem_id="gen-steps")
        guidance = gr.Slider(0.0, 20.0, value=DEFAULTS.guidance, step=0.5, label="Guidance")
    with gr.Row():
        width = gr.Number(value=0, precision=0, minimum=0, step=8, label="Width (0 = model's)")
        height = gr.Number(value=0, precision=0, minimum=0, step=8, label="Height (0 = model's)")
        num_images = gr.Slider(1, 8, value=DEFAULTS.num_images, step=1, label="Images", elem_id="gen-images")
        scheduler = gr.Dropdown(SCHEDULERS, value=DEFAULTS.scheduler, label="Scheduler")
    return GenerateSettings(
        negative=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        num_images=num_images,
        scheduler=scheduler,
    )


def _layout_picker() -> tuple[gr.Radio, gr.Textbox, gr.Radio]:
    layout_mode = gr.Radio(
        list(LAYOUT_MODES),
        value=NO_LAYOUT,
        elem_id="layout-mode",
        label="Layout: where each concept goes (none = global fusion; custom = a box per row)",
    )
    gr.Markdown(REGIONAL_NOTE, elem_id="layout-note")
    with gr.Accordion("Layout as JSON (the generate API's layout parameter)", open=False):
        layout_text = gr.Textbox(value="", label="layout", interactive=False, elem_id="layout-json")
        regional_mode = gr.Radio(
            list(REGIONAL_MODES),
            value=DEFAULTS.regional_mode,
            elem_id="regional-mode",
            label=REGIONAL_MODE_LABEL,
        )
    return layout_mode, layout_text, regional_mode


def _result_column() -> Results:
    gallery = gr.Gallery(
        label="Images (click one to select it)",
        columns=2,
        height=400,
        format="png",
        object_fit="contain",
        type="filepath",
        interactive=False,
        elem_id="generate-gallery",
    )
    info = gr.Markdown(elem_id="generate-info")
    use_settings = gr.Button(
        "Use the selected image's settings (prompt, seed, concepts, layout)", size="sm", elem_id="use-settings"
    )
    with gr.Row():
        layout_picture = gr.Image(
            label="Layout",
            type="pil",
            format="png",
            interactive=False,
            visible=False,
            height=LAYOUT_WIDGET[1],
            min_width=LAYOUT_WIDGET[0],
            elem_id="layout-picture",
        )
        overlay = gr.Image(
            label="Layout over the first image",
            type="pil",
            format="png",
            interactive=False,
            visible=False,
            height=LAYOUT_WIDGET[1],
            min_width=LAYOUT_WIDGET[0],
            elem_id="layout-overlay",
        )
    with gr.Group():
        fused_format = gr.Radio(
            list(EXPORT_FORMATS), value="spectral", label="Download the fused adapter as (global: no layout)"
        )
        fused_button = gr.Button("Download fused adapter")
        fused_files = gr.File(label="Fused files", file_count="multiple", interactive=False, height=110)
    return Results(
        gallery=gallery,
        info=info,
        use_settings=use_settings,
        layout_picture=layout_picture,
        overlay=overlay,
        fused_format=fused_format,
        fused_button=fused_button,
        fused_files=fused_files,
    )


def build_generate_tab() -> GenerateTab:
    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                label="Prompt (click a concept below to insert its trigger token)",
                lines=2,
                scale=5,
                elem_id="generate-prompt",
                placeholder="a photo of <my-dog> and <my-cat> on a sofa",
            )
            generate_button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-button")
            prompt_cursor = gr.Number(value=-1, precision=0, visible=False)
        with gr.Row():
            with gr.Column(scale=1):
                cards = gr.Gallery(
                    label="Your concepts: click one to use it",
                    columns=5,
                    height=170,
                    allow_preview=False,
                    preview=False,
                    fit_columns=False,
                    object_fit="contain",
                    format="png",
                    elem_id="generate-cards",
                )
                layout_mode, layout_text, regional_mode = _layout_picker()
                rows = [_concept_row(index) for index in range(CONCEPT_ROWS // 2)]
                with gr.Accordion("More concepts", open=False):
                    rows += [_concept_row(index) for index in range(CONCEPT_ROWS // 2, CONCEPT_ROWS)]
                concepts = gr.Textbox(
                    label="Fused concepts (name:strength, …; filled from the rows)", elem_id="generate-concepts"
                )
                settings = _generate_settings()
                with gr.Accordion("Load settings from a PNG", open=False):
                    settings_file = gr.File(
                        label="A PNG made by this app or the CLI",
                        file_types=[".png"],
                        height=110,
                        elem_id="settings-file",
                    )
                    settings_message = gr.Markdown(elem_id="settings-message")
            with gr.Column(scale=1):
                results = _result_column()
    return GenerateTab(
        prompt=prompt,
        prompt_cursor=prompt_cursor,
        generate_button=generate_button,
        cards=cards,
        rows=rows,
        concepts=concepts,
        layout_mode=layout_mode,
        layout_text=layout_text,
        regional_mode=regional_mode,
        settings=settings,
        settings_file=settings_file,
        settings_message=settings_message,
        results=results,
    )
