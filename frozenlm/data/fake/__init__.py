"""Tiny generated datasets (and pretrained-model stand-ins) in the real on-disk formats, one module per
dataset, each with `write(root, ...)`: what the tests train on and what `frozenlm bench --config`
uses where a config's dataset is absent (`frozenlm.bench_config.DATASETS` says which writer serves
which datamodule). Images are small and videos short; the datamodules resize and sample them, so the
batches have the config's real shapes. Each module imports its format's library itself (`av`, `h5py`,
`av2`), so importing this package needs none of them. `python -m frozenlm.data.fake.<name> ROOT` writes
one at its default size.

Models: `frozenlm.data.fake.meter_towers` (METER's vision and text towers) and
`frozenlm.data.fake.clip_teacher` (a CLIP teacher), tiny by default or at a real shape, random weights.
"""
