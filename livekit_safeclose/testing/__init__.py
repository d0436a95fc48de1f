"""Test support: fault-injecting fakes, the scenario catalogue and the pytest plugin."""
