"""How the shipped tiny backbones were made: the lab a student rarely needs to open.

The ``tiny`` preset's LLaVA starts from two backbones made by this project and shipped under
``data/pretrained/``: a tiny Llama that *reads* a scene written as text and answers questions about
it (``tiny-lm``), and a tiny CLIP whose patch tokens carry each object's shape and colour
(``tiny-clip``). The paper starts from pretrained ones (Vicuna, OpenAI's CLIP); ours had to be
pretrained first, on the shapes world's ``pretrain`` split, so that the rest of the tutorial has
backbones that already read and see.

- :mod:`~llava_lite.lab.config`: what decides each backbone (architecture, data, training, runtime);
- :mod:`~llava_lite.lab.tokenizers`: the tiny LM's BPE and chat template, the tiny CLIP's word-level tokenizer;
- :mod:`~llava_lite.lab.documents`: the tiny LM's reading documents and the batches of a step;
- :mod:`~llava_lite.lab.lm`: the tiny LM's pretraining loop, its text-only accuracy and perplexity;
- :mod:`~llava_lite.lab.clip_texts`: the texts each image is paired with, and their hard negatives;
- :mod:`~llava_lite.lab.clip`: the tiny CLIP's contrastive pretraining and its open_clip files;
- :mod:`~llava_lite.lab.cards`: the training plots and the tiny CLIP's card.

``llava-lite backbones lm`` and ``llava-lite backbones clip`` run the two recipes
(:func:`llava_lite.lab.lm.train_and_report`, :func:`llava_lite.lab.clip.train_and_report`). Each
backbone's folder has its card (``README.md``: the command, what it measures) and its ``LAB.md``
(the runs that led to the recipe). The core reads the shipped files with open_clip and
transformers alone and never imports this package.
"""
