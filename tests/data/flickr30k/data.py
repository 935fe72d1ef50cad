"""Moved into the package as `frozenlm.data.fake.flickr30k` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.flickr30k.data ROOT`
runs `python -m frozenlm.data.fake.flickr30k ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.flickr30k", run_name="__main__")
else:
    from frozenlm.data.fake.flickr30k import *  # noqa: F403
