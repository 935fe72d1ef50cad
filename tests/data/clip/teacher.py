"""Moved into the package as `frozenlm.data.fake.clip_teacher` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.clip.teacher ROOT`
runs `python -m frozenlm.data.fake.clip_teacher ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.clip_teacher", run_name="__main__")
else:
    from frozenlm.data.fake.clip_teacher import *  # noqa: F403
