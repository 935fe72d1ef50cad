"""Moved into the package as `frozenlm.data.fake.imagefolder` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.imagefolder.data ROOT`
runs `python -m frozenlm.data.fake.imagefolder ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.imagefolder", run_name="__main__")
else:
    from frozenlm.data.fake.imagefolder import *  # noqa: F403
