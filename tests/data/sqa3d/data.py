"""Moved into the package as `frozenlm.data.fake.sqa3d` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.sqa3d.data ROOT`
runs `python -m frozenlm.data.fake.sqa3d ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.sqa3d", run_name="__main__")
else:
    from frozenlm.data.fake.sqa3d import *  # noqa: F403
