"""Moved into the package as `frozenlm.data.fake.modelnet40` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.modelnet40.data ROOT`
runs `python -m frozenlm.data.fake.modelnet40 ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.modelnet40", run_name="__main__")
else:
    from frozenlm.data.fake.modelnet40 import *  # noqa: F403
