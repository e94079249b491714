"""The small world: StoryMem's memory experiment in miniature, on a procedural world whose ground truth is known.

Modules: :mod:`.world` (characters, scenes, clips, captions), :mod:`.detector` (ground-truth identity detector),
:mod:`.datasets` (clip sets and held-out stories), :mod:`.train_base` (the base video model, trained from
scratch), :mod:`.experiment` (the story experiment), :mod:`.checks` with :mod:`.base_check`,
:mod:`.memory_check`, :mod:`.vae_check` and :mod:`.loss_probe` (single-shot checks and loss probes). The
recipe is ``train_small_world.sh``; results are in ``results/``; ``README.md`` says what was found.
"""
