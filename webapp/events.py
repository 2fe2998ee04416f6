"""The page's events: every widget of ``webapp/layout*.py`` wired to its handler, by name.

An endpoint's widgets go in as ``inputs_kwargs`` (widget per parameter name: the API keeps the handler's
parameter names and order). A page handler that reads concept rows or updates several widgets goes
through ``Widgets``: it gets its inputs as keyword arguments and returns its outputs as a dict, both
named after the widgets (``webapp/page.py``).
"""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from spectral_diffusion.frontends.service import Service
from webapp import forms, handlers, page
from webapp.calls import in_own_thread
from webapp.layout import PRIVATE, QUIET, LibraryTab, TrainTab, card_index
from webapp.layout_generate import GenerateTab
from webapp.widgets import Widgets, by_name

# after a success: close the error toasts of earlier failures (gradio keeps them for 10 s, or until closed)
CLOSE_ERROR_TOASTS = (
    "() => document.querySelectorAll('.toast-body.error [data-testid=toast-close]').forEach(b => b.click())"
)
# the prompt box's caret as a character offset, kept when the box loses focus (a concept card is clicked)
PROMPT_CARET = (
    "() => { const box = document.querySelector('#generate-prompt textarea'); "
    "return box ? Array.from(box.value.slice(0, box.selectionStart)).length : -1; }"
)


class PageEvents:
    """The built tabs and the events between them; ``wire`` attaches every event once."""

    def __init__(self, service: Service, train: TrainTab, library: LibraryTab, generate: GenerateTab):
        self.service, self.train, self.library, self.generate = service, train, library, generate
        self.card_names = gr.State([])  # concepts of the Generate tab's cards, in order
        self.library_names = gr.State([])  # concepts of the Library tab's cards, in order
        self.refresh_inputs = Widgets(selected=library.selected, row_names=generate.row_names)
        self.refresh_outputs = Widgets(
            slot_maps=library.slot_maps,
            library_cards=library.cards,
            table=library.table,
            listing=library.listing,
            selected=library.selected,
            generate_cards=generate.cards,
            generate_card_names=self.card_names,
            library_card_names=self.library_names,
            row_names=generate.row_names,
        )
        self.slot_inputs = {"rank": train.rank, "name": train.name}
        self.selected_image = gr.State(None)  # the index of the generated image clicked last (None: the first)
        results = generate.results
        # outputs of events that can fail: each shows a red Error badge until an event updates it again
        self.error_outputs = [
            results.gallery,
            results.info,
            results.fused_files,
            library.exported,
            library.delete_message,
            library.listing,
            library.imported,
        ]

    def bound(self, handler):
        """``handler`` with the service as its first argument (the API keeps the other parameters' names).
        A plain handler runs in a thread of its own (``calls.in_own_thread``: no model work on gradio's
        long-lived threads); a generator only follows a training, which has its own thread."""
        bound = functools.partial(handler, self.service)
        bound.__name__ = handler.__name__  # gradio names an event after its function
        bound.__doc__ = None  # and describes an endpoint with its docstring: partial's would show
        return bound if inspect.isgeneratorfunction(handler) else in_own_thread(bound)

    def clear_errors(self, event):
        """Once ``event`` succeeds, nothing of earlier failures stays: their error toasts close and the red
        Error badges they left on other outputs clear (a no-change update of those outputs ends their
        error state)."""
        return event.success(
            lambda: gr.skip(), None, self.error_outputs, js=CLOSE_ERROR_TOASTS, show_progress="hidden", **PRIVATE
        )

    def refresh(self) -> dict:
        return by_name(self.bound(page.refresh), self.refresh_inputs, self.refresh_outputs)

    def then_refresh(self, event):
        """Refresh the library views and the slot hint after ``event``, whatever its outcome."""
        return event.then(**self.refresh(), **PRIVATE).then(
            self.bound(page.slot_info), inputs_kwargs=self.slot_inputs, outputs=self.train.slot_hint, **PRIVATE
        )

    def wire(self, demo: gr.Blocks) -> None:
        slot_info = self.bound(page.slot_info)
        demo.load(**self.refresh(), **PRIVATE).then(
            slot_info, inputs_kwargs=self.slot_inputs, outputs=self.train.slot_hint, **PRIVATE
        )
        # the name is checked as it is typed: "name taken" shows in the slot line, before Train is pressed
        gr.on(
            [self.train.rank.change, self.train.name.change],
            slot_info,
            inputs_kwargs=self.slot_inputs,
            outputs=self.train.slot_hint,
            **QUIET,
        )
        self.wire_train()
        self.wire_library()
        self.wire_generate()

    def wire_train(self) -> None:
        tab = self.train
        # the page's button: every outcome in the status line, a cancel as a notice (no Error badges)
        shown = Widgets(
            progress=tab.progress,
            previews=tab.previews,
            trained=tab.trained,
            loss_chart=tab.loss_chart,
            cancel_message=tab.cancel_message,
            name=tab.name,
            images=tab.images,
            masks=tab.advanced.masks,
        )
        trained = tab.train_button.click(
            **by_name(self.bound(page.train_on_page), Widgets(tab.form()), shown), concurrency_limit=None, **PRIVATE
        )
        self.clear_errors(trained)
        self.then_refresh(trained)
        # the API's endpoint (bad input and a cancel are errors for a client) on a button never shown
        self.then_refresh(
            tab.api_trigger.click(
                self.bound(handlers.train_concept),
                inputs_kwargs=tab.form(),
                outputs=[tab.api_status, tab.previews, tab.api_record],
                api_name="train_concept",
                concurrency_limit=None,
            )
        )
        tab.cancel_button.click(
            self.bound(handlers.cancel_training),
            None,
            tab.cancel_message,
            api_name="cancel_training",
            concurrency_limit=None,
        )
        tab.images.change(page.upload_thumbnails, tab.images, tab.thumbnails, **QUIET)
        tab.images.change(
            forms.caption_rows,
            inputs_kwargs={"files": tab.images, "current": tab.advanced.captions},
            outputs=tab.advanced.captions,
            **QUIET,
        )

    def wire_library(self) -> None:
        tab = self.library
        listed = tab.refresh_button.click(
            self.bound(handlers.list_concepts), None, tab.listing, api_name="list_concepts"
        )
        listed.then(**self.refresh(), **PRIVATE)
        exported = tab.export_button.click(
            self.bound(handlers.export_concept),
            outputs=tab.exported,
            inputs_kwargs={"name": tab.selected, "format": tab.export_format},
            api_name="export_concept",
        )
        deleted = tab.delete_button.click(
            self.bound(handlers.delete_concept),
            outputs=tab.delete_message,
            inputs_kwargs={"name": tab.selected, "confirm": tab.sure},
            api_name="delete_concept",
        )
        self.then_refresh(deleted).then(lambda: False, None, tab.sure, **PRIVATE)
        imported = tab.import_button.click(
            self.bound(handlers.import_concept),
            outputs=tab.imported,
            inputs_kwargs={"file": tab.import_file, "name": tab.import_name},
            api_name="import_concept",
        )
        imported.success(page.imported_summary, tab.imported, tab.imported_summary, **PRIVATE)
        imported.failure(lambda: "", None, tab.imported_summary, **PRIVATE)  # no summary of an earlier import
        self.then_refresh(imported)
        for event in (listed, exported, deleted, imported):
            self.clear_errors(event)

        def select_card(evt: gr.SelectData, names):
            return page.select_card(card_index(evt), names)

        tab.cards.select(select_card, self.library_names, tab.selected, **PRIVATE)

    def wire_generate(self) -> None:
        tab, results = self.generate, self.generate.results
        picked = Widgets(prompt=tab.prompt, prompt_cursor=tab.prompt_cursor, row_names=tab.row_names)
        clicked = Widgets(card_names=self.card_names, **picked)

        def pick_concept(evt: gr.SelectData, values):
            return picked.updates(page.pick_concept(self.service, card_index(evt), **clicked.read(values)))

        # a card's token goes in at the prompt's caret: the box remembers it as it loses focus to the click
        tab.prompt.blur(None, None, tab.prompt_cursor, js=PROMPT_CARET, **PRIVATE)
        tab.cards.select(pick_concept, set(clicked.components()), picked.components(), **PRIVATE)
        rows = Widgets(row_names=tab.row_names, row_strengths=tab.row_strengths)
        gr.on(
            [row.change for row in rows.components()],
            **by_name(page.rows_to_spec, rows, tab.concepts),
            show_progress="hidden",
            **PRIVATE,
        )
        self.wire_layout()
        # the button and the prompt's Enter key are one event: one endpoint, one queue
        # the layout text is derived from the picker on its change event; a click right after picking a
        # layout could overtake that event and draw without the layout, so the click recomputes it first
        layout_fields = Widgets(
            mode=tab.layout_mode,
            prompt=tab.prompt,
            negative=tab.settings.negative,
            row_names=tab.row_names,
            row_boxes=tab.row_boxes,
            region_prompts=tab.region_prompts,
        )
        generated = gr.on(
            [tab.generate_button.click, tab.prompt.submit],
            **by_name(forms.layout_spec, layout_fields, tab.layout_text),
            show_progress="hidden",
            **PRIVATE,
        ).then(
            self.bound(handlers.generate),
            inputs_kwargs=tab.request(),
            outputs=[results.gallery, results.info],
            api_name="generate",
            concurrency_limit=1,
        )
        generated.success(page.result_overlay, results.gallery, results.overlay, **PRIVATE)
        generated.success(lambda: None, None, self.selected_image, **PRIVATE)  # new images: none selected
        self.clear_errors(generated)
        fused = results.fused_button.click(
            self.bound(handlers.export_fused),
            outputs=results.fused_files,
            inputs_kwargs={"concepts": tab.concepts, "format": results.fused_format},
            api_name="export_fused",
        )
        self.clear_errors(fused)

    def wire_layout(self) -> None:
        """The layout editor: any change redraws the layout and rewrites the generate endpoint's layout text;
        a PNG's settings fill every field (which then redraws the layout)."""
        tab, results, settings = self.generate, self.generate.results, self.generate.settings
        editor = Widgets(
            layout_mode=tab.layout_mode,
            prompt=tab.prompt,
            negative=settings.negative,
            width=settings.width,
            height=settings.height,
            row_names=tab.row_names,
            row_boxes=tab.row_boxes,
            region_prompts=tab.region_prompts,
        )
        drawn = Widgets(layout_text=tab.layout_text, layout_picture=results.layout_picture, box_rows=tab.box_rows)
        gr.on(
            [component.change for component in editor.components()],
            **by_name(self.bound(page.layout_editor), editor, drawn),
            **QUIET,
        )
        # every field of forms.LoadedSettings (the image count is not stored with an image's settings)
        loaded = Widgets(
            prompt=tab.prompt,
            negative=settings.negative,
            seed=settings.seed,
            steps=settings.steps,
            guidance=settings.guidance,
            width=settings.width,
            height=settings.height,
            scheduler=settings.scheduler,
            row_names=tab.row_names,
            row_strengths=tab.row_strengths,
            layout_mode=tab.layout_mode,
            row_boxes=tab.row_boxes,
            region_prompts=tab.region_prompts,
            regional_mode=tab.regional_mode,
            settings_message=tab.settings_message,
        )
        tab.settings_file.upload(
            **by_name(page.load_settings, Widgets(settings_file=tab.settings_file), loaded), **PRIVATE
        )

        # a generated image's settings back into the form: the image clicked last, else the first
        def select_image(evt: gr.SelectData):
            return card_index(evt)

        results.gallery.select(select_image, None, self.selected_image, **PRIVATE)
        chosen = Widgets(gallery=results.gallery, selected_image=self.selected_image)
        results.use_settings.click(**by_name(page.image_settings, chosen, loaded), **PRIVATE)
