"""Moved into the package as `frozenlm.data.fake.imagenet_variants` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.imagenet_variants.data ROOT`
runs `python -m frozenlm.data.fake.imagenet_variants ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.imagenet_variants", run_name="__main__")
else:
    from frozenlm.data.fake.imagenet_variants import *  # noqa: F403
