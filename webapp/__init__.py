"""Spectral Diffusion web app: train concepts, manage the library, generate with concepts fused.

    python app.py [--model builtin:toy] [--library concepts] [--host 127.0.0.1] [--port 7860]
                  [--auth user:password] [--share] [--device cpu]

The page is a thin layer over ``spectral_diffusion.frontends.service.Service``; nothing is loaded until a
request needs the model. ``main`` builds the page and starts the server, ``layout`` and
``layout_generate`` lay out the tabs, ``events`` wires their widgets by name to the handlers of
``handlers`` (the API endpoints) and ``page`` (the page's own), which ``calls`` runs; ``forms`` turns
widget values into requests, ``render`` and ``drawings`` show results (no gradio in those three).
Every action is also a named API endpoint for ``gradio_client``:

    train_concept(images, name, class_word, variant, rank, steps,
                  [lr_unet, lr_text, lr_embedding, batch_size, resolution, seed, masks, captions])
        -> (status, previews, record); status: {name, state, step, total_steps, loss, eta_seconds, slot, token,
           message}, state preparing / running / done (record set) / cancelled / failed (both raise)
    list_concepts() -> [record, ...]
    delete_concept(name, confirm) -> message
    import_concept(file, name) -> record
    export_concept(name, format) -> [files]
    generate(prompt, concepts, negative, seed, steps, guidance, width, height, num_images, scheduler, [layout])
        -> (images, message)
    export_fused(concepts, format) -> [files]
    cancel_training() -> message

``concepts`` is text: ``"dog,cat:0.8"`` (strength 1.0 when omitted) or JSON ``{"dog": 1, "cat": 0.8}``.
``layout`` (optional, "" = global fusion): ``auto``, a preset (``left-right``, ``top-bottom``, ``thirds``,
``grid``) or a layout JSON ``{"prompt", "negative", "regions": [{"concept", "box": [x0, y0, x1, y1], "prompt"}]}``.
Bracketed parameters are optional: calls without them work as before.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is first imported
