"""Loopback runs of the fedecg Flower apps; the command line is `python -m simulations.deploy_loopback`."""
