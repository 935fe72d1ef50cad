"""Moved into the package as `frozenlm.data.fake.mnist` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.mnist.data ROOT`
runs `python -m frozenlm.data.fake.mnist ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.mnist", run_name="__main__")
else:
    from frozenlm.data.fake.mnist import *  # noqa: F403
