"""The small world: StoryMem's memory experiment in miniature, on a procedural world whose ground truth is known.

The world: :mod:`.characters`, :mod:`.scenes` and :mod:`.world` (motion, clips, captions; the one import for
all of it). Ground truth: :mod:`.detection` and :mod:`.detector`. Data: :mod:`.datasets` (clip sets and held-out
stories). The base video model: :mod:`.train_base`, with :mod:`.base_clips` and :mod:`.base_steps`. The story
experiment: :mod:`.experiment_plan` and :mod:`.experiment`. Single-shot checks and probes: :mod:`.checks`,
:mod:`.base_check`, :mod:`.memory_check`, :mod:`.vae_check`, :mod:`.loss_probe`. The recipe is
``train_small_world.sh``; results are in ``results/``; ``README.md`` says what was found.
"""
