"""llava-lite: Visual Instruction Tuning (LLaVA), taught by doing all of it.

The notebooks under ``notebooks/`` explain; this package does the work. One module a concept:
``world`` (the shapes world), ``coco`` (symbolic contexts), ``teachers`` (instruction data),
``backbones`` / ``vision`` / ``features`` (the pretrained parts), ``model`` / ``train`` (LLaVA),
``evaluate``, ``export``; ``cli`` wires them to the ``llava-lite`` command.
"""
__version__ = "0.1.0"
