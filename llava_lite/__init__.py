"""llava-lite: Visual Instruction Tuning (LLaVA), taught by doing all of it.

The notebooks under ``notebooks/`` explain; this package does the work, one concept of the paper
a module. Dependencies run down this map; the lab is used by nothing above it but ``cli``::

    config, paths, io, jsonl, envcheck   settings and presets · where files live · atomic writes · JSONL logs
    hub                                  hub models from the cache or the hub, HF_HUB_OFFLINE, a clear error
    §3 data generation
      world, facts                       the shapes world in COCO format · facts captions and teachers state
      coco                               COCO captions + instances -> symbolic contexts
      coco_download                      COCO 2017 fetched (resumed, checked) into the world's layout
      scene_text                         a context written as text for a reader that cannot see
      teachers/                          symbolic, endpoint and local chat teachers, prompts as files, MC questions
      validate                           LLaVA-format checks
      released                           LLaVA's released JSON (LLaVA-Pretrain, LLaVA-Instruct-150K) as a split
    §4 vision, labels, model
      vision, features                   the frozen CLIP tower and its one image route · the feature cache
      probes, retrieval                  what the tower's features hold · image-text retrieval of a CLIP
      conversation, data                 templates and labels per turn · examples, batches, collators
      model                              projector + splice + token loss; LoRA
    §4.2 the two stages
      train, memory                      one accelerate loop and schedule, checkpoints · the memory estimate
      stages, lesson                     load the parts, run a stage, load it back · one setup call a notebook
    §5 evaluation, and using the model
      generate, evaluate                 greedy replies in batches, one streamed · the exact-answer score, its baselines
      judge                              the judge score (LLaVA-Bench style): endpoint and offline judges
      scienceqa                          ScienceQA's format, the world's multiple-choice set, its training and accuracy
      ablate                             the paper's ablations in miniature: rows retrained over seeds, one table
      chat                               a conversation about one picture: the session, the terminal, the widget
      export                             a checkpoint as a Hugging Face Llava folder, checked against ours, served
    viz, figures, tutorial               notebook pictures and tables · the course's SVG figures · run them headless
    cli                                  every ``llava-lite`` sub-command, declared in one place
    lab/                                 how the shipped tiny LM and tiny CLIP were made (rarely opened)
"""

__version__ = "0.1.0"
