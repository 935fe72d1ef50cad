"""Moved into the package as `frozenlm.data.fake.caltech256` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.caltech256.data ROOT`
runs `python -m frozenlm.data.fake.caltech256 ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.caltech256", run_name="__main__")
else:
    from frozenlm.data.fake.caltech256 import *  # noqa: F403
