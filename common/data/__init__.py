"""PTB-XL data layer: reading and caching records (ptbxl), simulated hospitals (partition), download (fetch).

Import from the submodules (`from common.data.ptbxl import load_dataset`); this package imports nothing
heavy so that `import common.data.partition` stays cheap.
"""
