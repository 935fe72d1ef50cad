"""Moved into the package as `frozenlm.data.fake.meter_towers` (so an installed frozenlm can write it, e.g. for
`frozenlm bench --config` without the dataset); re-exported here for the tests. `python -m tests.data.meter.towers ROOT`
runs `python -m frozenlm.data.fake.meter_towers ROOT`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("frozenlm.data.fake.meter_towers", run_name="__main__")
else:
    from frozenlm.data.fake.meter_towers import *  # noqa: F403
