"""The page's layout: the settings every tab shares, and the Train and Library tabs (UI only, no events).

Each builder returns its tab's widgets as a dataclass of named fields; ``webapp/events.py`` wires them
by those names. The Generate tab is in ``webapp/layout_generate.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gradio as gr

from spectral_diffusion.core.config import VARIANTS
from spectral_diffusion.formats import EXPORT_FORMATS
from spectral_diffusion.frontends.service import TrainingStatus
from webapp.forms import TrainForm
from webapp.render import TABLE_HEADERS, progress_html

MAX_FILE_SIZE = "1gb"  # one upload: images are limited further by data.py, adapters can be large (SDXL)
PRIVATE = {"api_visibility": "private"}  # page-only events: no API endpoint
QUIET = {"show_progress": "hidden", "trigger_mode": "always_last", **PRIVATE}  # page helpers on every keystroke
TABLE_WIDTHS = ["11%", "13%", "5%", "9%", "5%", "10%", "7%", "22%", "18%"]  # the library table at 1280 px


def card_index(evt: gr.SelectData) -> int:
    """The index of the gallery item a select event clicked."""
    return evt.index if isinstance(evt.index, int) else evt.index[0]


# ----- the Train tab --------------------------------------------------------------------------------


@dataclass
class AdvancedSettings:
    """The Train tab's Advanced accordion (named as ``forms.TrainForm``'s fields)."""

    lr_unet: gr.Number
    lr_text: gr.Number
    lr_embedding: gr.Number
    batch_size: gr.Number
    resolution: gr.Number
    seed: gr.Number
    masks: gr.File
    captions: gr.Dataframe


@dataclass
class TrainTab:
    images: gr.File
    thumbnails: gr.Gallery
    name: gr.Textbox
    class_word: gr.Textbox
    variant: gr.Radio
    rank: gr.Number
    steps: gr.Number
    advanced: AdvancedSettings
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

    def form(self) -> dict[str, gr.components.Component]:
        """The widgets of ``forms.TrainForm``'s fields, by field name, in its order (the train_concept
        endpoint's parameters)."""
        widgets = {**vars(self), **vars(self.advanced)}
        return {field.name: widgets[field.name] for field in dataclasses.fields(TrainForm)}


def _advanced_settings(defaults: dict) -> AdvancedSettings:
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        with gr.Row():
            lr_unet = gr.Number(value=defaults["lr_unet"], label="Learning rate: UNet", elem_id="train-lr-unet")
            lr_text = gr.Number(value=defaults["lr_text"], label="Learning rate: text encoder")
            lr_embedding = gr.Number(value=defaults["lr_embedding"], label="Learning rate: token embedding")
        with gr.Row():
            batch_size = gr.Number(value=defaults["batch_size"], precision=0, minimum=1, label="Batch size")
            resolution = gr.Number(
                value=defaults["resolution"],
                precision=0,
                minimum=0,
                step=8,
                label="Resolution (0 = the model's)",
                elem_id="train-resolution",
            )
            seed = gr.Number(value=defaults["seed"], precision=0, minimum=0, label="Seed")
        masks = gr.File(
            label="Foreground masks (optional): one per photo, same file name, white = the concept",
            file_count="multiple",
            file_types=["image"],
            elem_id="train-masks",
        )
        captions = gr.Dataframe(
            headers=["photo", "caption"],
            column_count=2,
            static_columns=[0],
            type="array",
            interactive=True,
            wrap=True,
            elem_id="train-captions",
            label="Captions (optional, one per photo; {token} stands for the trigger token; "
            "empty: the built-in templates)",
        )
    return AdvancedSettings(
        lr_unet=lr_unet,
        lr_text=lr_text,
        lr_embedding=lr_embedding,
        batch_size=batch_size,
        resolution=resolution,
        seed=seed,
        masks=masks,
        captions=captions,
    )


def build_train_tab(rank: int, defaults: dict) -> TrainTab:
    with gr.Tab("Train", id="train"), gr.Row():
        with gr.Column(scale=3):
            images = gr.File(
                label="Images of the concept (drag and drop at least 3 photos; 3-20 work best), with their "
                "photo.txt captions if they have them",
                file_count="multiple",
                file_types=["image", ".txt"],
                height=150,
                elem_id="train-images",
            )
            thumbnails = gr.Gallery(
                label="Uploaded photos",
                columns=8,
                height=130,
                object_fit="contain",
                allow_preview=False,
                format="png",
                interactive=False,
                elem_id="train-thumbnails",
            )
            with gr.Row():
                name = gr.Textbox(label="Name", placeholder="my-dog", elem_id="train-name")
                class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="train-class")
            with gr.Row():
                variant = gr.Radio(
                    list(VARIANTS),
                    value="additive",
                    label="Variant",
                    info=(
                        "additive learns new shapes; rotational: exactly orthogonal to other concepts, but it only "
                        "re-mixes what the model already draws (on builtin:toy it learnt no new shape)"
                    ),
                )
                rank_box = gr.Number(value=rank, precision=0, minimum=1, label="Rank", elem_id="train-rank")
                steps = gr.Number(value=0, precision=0, minimum=0, label="Steps (0 = automatic)", elem_id="train-steps")
            advanced = _advanced_settings(defaults)
            slot_hint = gr.Markdown(elem_id="train-slot")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
            cancel_message = gr.Markdown(elem_id="train-cancel")  # under the buttons: where the eye is
            api_trigger = gr.Button(visible=False)
        with gr.Column(scale=2):
            progress = gr.HTML(
                progress_html(TrainingStatus(message="no training yet")), label="Progress", elem_id="train-progress"
            )
            previews = gr.Gallery(
                label="Previews (their step below each)",
                columns=4,
                height="auto",
                format="png",
                object_fit="contain",
                interactive=False,
                elem_id="train-previews",
            )
            loss_chart = gr.Image(
                label="Training loss", type="pil", format="png", interactive=False, height=220, elem_id="train-loss"
            )
            trained = gr.Markdown(elem_id="train-result")
            api_status, api_record = gr.JSON(label="status", visible=False), gr.JSON(label="record", visible=False)
    return TrainTab(
        images=images,
        thumbnails=thumbnails,
        name=name,
        class_word=class_word,
        variant=variant,
        rank=rank_box,
        steps=steps,
        advanced=advanced,
        slot_hint=slot_hint,
        train_button=train_button,
        cancel_button=cancel_button,
        api_trigger=api_trigger,
        progress=progress,
        previews=previews,
        loss_chart=loss_chart,
        trained=trained,
        cancel_message=cancel_message,
        api_status=api_status,
        api_record=api_record,
    )


# ----- the Library tab ------------------------------------------------------------------------------


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


def build_library_tab() -> LibraryTab:
    with gr.Tab("Library", id="library"):
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("**Slot maps**: which singular-vector slots each base model's concepts hold")
                slot_maps = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="slot-maps")
                cards = gr.Gallery(
                    label="Concepts",
                    columns=6,
                    height=220,
                    format="png",
                    preview=False,
                    fit_columns=False,
                    object_fit="contain",
                    elem_id="library-cards",
                )
            with gr.Column(scale=2):
                selected = gr.Dropdown(label="Concept", choices=[], allow_custom_value=True, elem_id="library-concept")
                with gr.Group():
                    export_format = gr.Radio(
                        list(EXPORT_FORMATS),
                        value="spectral",
                        label="Download as",
                        info="spectral: our adapter · lora: diffusers/PEFT · "
                        "kohya: AUTOMATIC1111/ComfyUI (+ textual inversion)",
                    )
                    export_button = gr.Button("Download")
                    exported = gr.File(label="Files", file_count="multiple", interactive=False, height=110)
                with gr.Group():
                    sure = gr.Checkbox(label="I am sure: delete this concept and free its slot")
                    delete_button = gr.Button("Delete", variant="stop")
                    delete_message = gr.Markdown()
                with gr.Group():
                    import_file = gr.File(
                        label="Import an adapter (.safetensors)", file_types=[".safetensors"], height=130
                    )
                    import_name = gr.Textbox(label="Import under the name (optional)")
                    import_button = gr.Button("Import")
                    imported = gr.JSON(label="record", visible=False)
                    imported_summary = gr.Markdown(elem_id="library-imported")
        table = gr.Dataframe(
            headers=TABLE_HEADERS, interactive=False, wrap=False, column_widths=TABLE_WIDTHS, elem_id="library-table"
        )
        refresh_button = gr.Button("Refresh", size="sm")
        with gr.Accordion("Library as JSON", open=False):
            listing = gr.JSON(label="list_concepts")
    return LibraryTab(
        slot_maps=slot_maps,
        cards=cards,
        table=table,
        refresh_button=refresh_button,
        listing=listing,
        selected=selected,
        export_format=export_format,
        export_button=export_button,
        exported=exported,
        sure=sure,
        delete_button=delete_button,
        delete_message=delete_message,
        import_file=import_file,
        import_name=import_name,
        import_button=import_button,
        imported=imported,
        imported_summary=imported_summary,
    )
