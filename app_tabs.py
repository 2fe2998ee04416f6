"""The Gradio page's layout: one builder per tab, each returning its widgets (UI only, no events).

``app.py`` wires the events of these widgets to the handlers of ``app_ui.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

import app_values
import app_views
from spectral_diffusion.core.config import VARIANTS
from spectral_diffusion.formats import EXPORT_FORMATS
from spectral_diffusion.frontends.service import TrainingStatus
from spectral_diffusion.generation.request import DEFAULTS
from spectral_diffusion.generation.schedulers import SCHEDULERS

CONCEPT_ROWS = 8  # concept pickers on the Generate tab (4 shown, 4 more folded)
MAX_FILE_SIZE = "1gb"  # one upload: images are limited further by data.py, adapters can be large (SDXL)
PRIVATE = {"api_visibility": "private"}  # page-only events: no API endpoint
QUIET = {"show_progress": "hidden", "trigger_mode": "always_last", **PRIVATE}  # page helpers on every keystroke
STARTUP_SECONDS = 180  # how long start-up waits for the page to answer (a loaded machine is slow, not broken)
TABLE_WIDTHS = ["11%", "13%", "5%", "9%", "5%", "10%", "7%", "22%", "18%"]  # the library table at 1280 px
REGIONAL_NOTE = (
    "Regional composition draws each concept only inside its box: its slot is routed to its region and "
    "its prompt tokens. It uses the concepts' live slots (the app never bakes them into the weights; a "
    "baked model could not route). Downloaded and exported LoRAs stay global: a LoRA cannot route."
)

CSS = """
.sd-bar {height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; margin: 4px 0 6px 0;}
.sd-bar > div {height: 100%; background: var(--color-accent); transition: width .3s;}
.sd-status {font-size: 0.95em;}
.sd-problem {color: var(--error-text-color, #b91c1c); font-weight: 600;}
#train-previews img, #train-thumbnails img, #generate-gallery img, #library-cards img, #generate-cards img
    {image-rendering: pixelated;}
#library-cards .caption-label, #generate-cards .caption-label {max-width: 100%; white-space: normal; word-break: break-all;}
#library-table th, #library-table td {white-space: nowrap;}
"""


# ----- layout: one builder per tab, each returns its widgets ----------------------------------------


@dataclass
class TrainTab:
    images: gr.File
    thumbnails: gr.Gallery
    name: gr.Textbox
    class_word: gr.Textbox
    variant: gr.Radio
    rank: gr.Number
    steps: gr.Number
    advanced: list[gr.components.Component]  # in app_values.ADVANCED order
    slot_hint: gr.Markdown
    train_button: gr.Button
    cancel_button: gr.Button
    api_trigger: gr.Button  # never shown: the train_concept endpoint (the page's button has its own event)
    progress: gr.HTML
    previews: gr.Gallery
    loss_chart: gr.Image
    trained: gr.Markdown  # the page's summary of the trained concept
    cancel_message: gr.Markdown
    api_status: gr.JSON  # never shown: the train_concept endpoint's status and record, as data
    api_record: gr.JSON


@dataclass
class LibraryTab:
    slot_maps: gr.Image
    cards: gr.Gallery
    table: gr.Dataframe
    refresh_button: gr.Button
    listing: gr.JSON
    selected: gr.Dropdown
    export_format: gr.Radio
    export_button: gr.Button
    exported: gr.File
    sure: gr.Checkbox
    delete_button: gr.Button
    delete_message: gr.Markdown
    import_file: gr.File
    import_name: gr.Textbox
    import_button: gr.Button
    imported: gr.JSON  # never shown: the import_concept endpoint's record
    imported_summary: gr.Markdown  # the page's summary of it


@dataclass
class ConceptRow:
    name: gr.Dropdown
    strength: gr.Slider
    box_row: gr.Row  # shown for a custom layout only
    box: list[gr.Number]  # x0, y0, x1, y1
    region_prompt: gr.Textbox


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
    settings: list[gr.components.Component]  # negative, seed, steps, guidance, width, height, images, scheduler
    settings_file: gr.File
    settings_message: gr.Markdown
    gallery: gr.Gallery
    info: gr.Markdown
    use_settings: gr.Button  # the selected image's stored settings into the form
    layout_picture: gr.Image
    overlay: gr.Image
    fused_format: gr.Radio
    fused_button: gr.Button
    fused_files: gr.File

    @property
    def row_names(self) -> list[gr.Dropdown]:
        return [row.name for row in self.rows]

    @property
    def row_strengths(self) -> list[gr.Slider]:
        return [row.strength for row in self.rows]

    @property
    def layout_rows(self) -> list[gr.components.Component]:
        """The editor's values in ``app_values.LayoutRows.split`` order: names, boxes, region prompts."""
        return [*self.row_names, *[n for row in self.rows for n in row.box], *[r.region_prompt for r in self.rows]]


def _advanced_settings(defaults: dict) -> list[gr.components.Component]:
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        with gr.Row():
            lr_unet = gr.Number(value=defaults["lr_unet"], label="Learning rate: UNet", elem_id="train-lr-unet")
            lr_text = gr.Number(value=defaults["lr_text"], label="Learning rate: text encoder")
            lr_embedding = gr.Number(value=defaults["lr_embedding"], label="Learning rate: token embedding")
        with gr.Row():
            batch_size = gr.Number(value=defaults["batch_size"], precision=0, minimum=1, label="Batch size")
            resolution = gr.Number(value=defaults["resolution"], precision=0, minimum=0, step=8,
                                   label="Resolution (0 = the model's)", elem_id="train-resolution")
            seed = gr.Number(value=defaults["seed"], precision=0, minimum=0, label="Seed")
        masks = gr.File(label="Foreground masks (optional): one per photo, same file name, white = the concept",
                        file_count="multiple", file_types=["image"], elem_id="train-masks")
        captions = gr.Dataframe(headers=["photo", "caption"], column_count=2, static_columns=[0], type="array",
                                interactive=True, wrap=True, elem_id="train-captions",
                                label="Captions (optional, one per photo; {token} stands for the trigger token; "
                                      "empty: the built-in templates)")
    return [lr_unet, lr_text, lr_embedding, batch_size, resolution, seed, masks, captions]


def build_train_tab(rank: int, defaults: dict) -> TrainTab:
    with gr.Tab("Train", id="train"), gr.Row():
        with gr.Column(scale=3):
            images = gr.File(label="Images of the concept (drag and drop 3-20 photos)",
                             file_count="multiple", file_types=["image"], height=150, elem_id="train-images")
            thumbnails = gr.Gallery(label="Uploaded photos", columns=8, height=130, object_fit="contain",
                                    allow_preview=False, format="png", interactive=False,
                                    elem_id="train-thumbnails")
            with gr.Row():
                name = gr.Textbox(label="Name", placeholder="my-dog", elem_id="train-name")
                class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="train-class")
            with gr.Row():
                variant = gr.Radio(list(VARIANTS), value="additive", label="Variant",
                                   info="rotational: zero interference between concepts")
                rank_box = gr.Number(value=rank, precision=0, minimum=1, label="Rank", elem_id="train-rank")
                steps = gr.Number(value=0, precision=0, minimum=0, label="Steps (0 = automatic)",
                                  elem_id="train-steps")
            advanced = _advanced_settings(defaults)
            slot_hint = gr.Markdown(elem_id="train-slot")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
            cancel_message = gr.Markdown(elem_id="train-cancel")  # under the buttons: where the eye is
            api_trigger = gr.Button(visible=False)
        with gr.Column(scale=2):
            progress = gr.HTML(app_views.progress_html(TrainingStatus(message="no training yet")),
                               label="Progress", elem_id="train-progress")
            previews = gr.Gallery(label="Previews (their step below each)", columns=4, height="auto", format="png",
                                  object_fit="contain", interactive=False, elem_id="train-previews")
            loss_chart = gr.Image(label="Training loss", type="pil", format="png", interactive=False, height=220,
                                  elem_id="train-loss")
            trained = gr.Markdown(elem_id="train-result")
            api_status, api_record = gr.JSON(label="status", visible=False), gr.JSON(label="record", visible=False)
    return TrainTab(images, thumbnails, name, class_word, variant, rank_box, steps, advanced, slot_hint,
                    train_button, cancel_button, api_trigger, progress, previews, loss_chart, trained, cancel_message,
                    api_status, api_record)


def build_library_tab() -> LibraryTab:
    with gr.Tab("Library", id="library"):
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("**Slot maps**: which singular-vector slots each base model's concepts hold")
                slot_maps = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                     elem_id="slot-maps")
                cards = gr.Gallery(label="Concepts", columns=6, height=220, format="png", preview=False,
                                   fit_columns=False, object_fit="contain", elem_id="library-cards")
            with gr.Column(scale=2):
                selected = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True,
                                       elem_id="library-concept")
                with gr.Group():
                    export_format = gr.Radio(list(EXPORT_FORMATS), value="spectral", label="Download as",
                                             info="spectral: our adapter · lora: diffusers/PEFT · "
                                                  "kohya: AUTOMATIC1111/ComfyUI (+ textual inversion)")
                    export_button = gr.Button("Download")
                    exported = gr.File(label="Files", file_count="multiple", interactive=False, height=110)
                with gr.Group():
                    sure = gr.Checkbox(label="I am sure: delete this concept and free its slot")
                    delete_button = gr.Button("Delete", variant="stop")
                    delete_message = gr.Markdown()
                with gr.Group():
                    import_file = gr.File(label="Import an adapter (.safetensors)", file_types=[".safetensors"],
                                          height=130)
                    import_name = gr.Textbox(label="Import under the name (optional)")
                    import_button = gr.Button("Import")
                    imported = gr.JSON(label="record", visible=False)
                    imported_summary = gr.Markdown(elem_id="library-imported")
        table = gr.Dataframe(headers=app_views.TABLE_HEADERS, interactive=False, wrap=False,
                             column_widths=TABLE_WIDTHS, elem_id="library-table")
        refresh_button = gr.Button("Refresh", size="sm")
        with gr.Accordion("Library as JSON", open=False):
            listing = gr.JSON(label="list_concepts")
    return LibraryTab(slot_maps, cards, table, refresh_button, listing, selected, export_format, export_button,
                      exported, sure, delete_button, delete_message, import_file, import_name, import_button,
                      imported, imported_summary)


def _concept_row(index: int) -> ConceptRow:
    with gr.Row(equal_height=True):
        name = gr.Dropdown(choices=[], label=f"Concept {index + 1}", scale=2, allow_custom_value=True,
                           elem_id=f"concept-{index}")
        strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", scale=3, elem_id=f"strength-{index}")
    with gr.Row(visible=False, equal_height=True) as box_row:
        box = [gr.Number(value=value, minimum=0, maximum=1, step=0.05, label=label, min_width=60,
                         elem_id=f"box-{index}-{label}")
               for value, label in zip(app_values.default_box(index), ("x0", "y0", "x1", "y1"), strict=True)]
        region_prompt = gr.Textbox(label="Region prompt (empty: the prompt)", scale=3, elem_id=f"region-{index}")
    return ConceptRow(name, strength, box_row, box, region_prompt)


def _generate_settings() -> list[gr.components.Component]:
    """The Generate tab's inputs after the concepts, in the order of the generate endpoint."""
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
    return [negative, seed, steps, guidance, width, height, num_images, scheduler]


def _layout_picker() -> tuple[gr.Radio, gr.Textbox]:
    layout_mode = gr.Radio(list(app_values.LAYOUT_MODES), value=app_values.NO_LAYOUT, elem_id="layout-mode",
                           label="Layout: where each concept goes (none = global fusion; custom = a box per row)")
    gr.Markdown(REGIONAL_NOTE, elem_id="layout-note")
    with gr.Accordion("Layout as JSON (the generate API's layout parameter)", open=False):
        layout_text = gr.Textbox(value="", label="layout", interactive=False, elem_id="layout-json")
    return layout_mode, layout_text


def _result_column():
    gallery = gr.Gallery(label="Images (click one to select it)", columns=2, height=400, format="png",
                         object_fit="contain", type="filepath", interactive=False, elem_id="generate-gallery")
    info = gr.Markdown(elem_id="generate-info")
    use_settings = gr.Button("Use the selected image's settings (prompt, seed, concepts, layout)", size="sm",
                             elem_id="use-settings")
    with gr.Row():
        layout_picture = gr.Image(label="Layout", type="pil", format="png", interactive=False, visible=False,
                                  height=app_views.LAYOUT_WIDGET[1], min_width=app_views.LAYOUT_WIDGET[0],
                                  elem_id="layout-picture")
        overlay = gr.Image(label="Layout over the first image", type="pil", format="png", interactive=False,
                           visible=False, height=app_views.LAYOUT_WIDGET[1], min_width=app_views.LAYOUT_WIDGET[0],
                           elem_id="layout-overlay")
    with gr.Group():
        fused_format = gr.Radio(list(EXPORT_FORMATS), value="spectral",
                                label="Download the fused adapter as (global: no layout)")
        fused_button = gr.Button("Download fused adapter")
        fused_files = gr.File(label="Fused files", file_count="multiple", interactive=False, height=110)
    return gallery, info, use_settings, layout_picture, overlay, fused_format, fused_button, fused_files


def build_generate_tab() -> GenerateTab:
    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(label="Prompt (click a concept below to insert its trigger token)", lines=2,
                                scale=5, elem_id="generate-prompt",
                                placeholder="a photo of <my-dog> and <my-cat> on a sofa")
            generate_button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate-button")
            prompt_cursor = gr.Number(value=-1, precision=0, visible=False)
        with gr.Row():
            with gr.Column(scale=1):
                cards = gr.Gallery(label="Your concepts: click one to use it", columns=5, height=170,
                                   allow_preview=False, preview=False, fit_columns=False, object_fit="contain",
                                   format="png", elem_id="generate-cards")
                layout_mode, layout_text = _layout_picker()
                rows = [_concept_row(index) for index in range(CONCEPT_ROWS // 2)]
                with gr.Accordion("More concepts", open=False):
                    rows += [_concept_row(index) for index in range(CONCEPT_ROWS // 2, CONCEPT_ROWS)]
                concepts = gr.Textbox(label="Fused concepts (name:strength, …; filled from the rows)",
                                      elem_id="generate-concepts")
                settings = _generate_settings()
                with gr.Accordion("Load settings from a PNG", open=False):
                    settings_file = gr.File(label="A PNG made by this app or the CLI", file_types=[".png"],
                                            height=110, elem_id="settings-file")
                    settings_message = gr.Markdown(elem_id="settings-message")
            with gr.Column(scale=1):
                results = _result_column()
    return GenerateTab(prompt, prompt_cursor, generate_button, cards, rows, concepts, layout_mode, layout_text, settings,
                       settings_file, settings_message, *results)


# ----- events ---------------------------------------------------------------------------------------


def card_index(evt: gr.SelectData) -> int:
    return evt.index if isinstance(evt.index, int) else evt.index[0]
