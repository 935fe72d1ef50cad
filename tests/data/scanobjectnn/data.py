"""Moved into the package as `frozenlm.data.fake.scanobjectnn` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.scanobjectnn.data ROOT`
runs `python -m frozenlm.data.fake.scanobjectnn ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.scanobjectnn", run_name="__main__")
else:
    from frozenlm.data.fake.scanobjectnn import *  # noqa: F403
