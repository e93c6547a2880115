"""PTB-XL data layer, one job per module.

metadata (tables, validation), labels (SCP statements, superclasses), demographics, leads (lead algebra),
records (WFDB reading), cache (preprocessed arrays on disk), dataset (ECGDataset, load_dataset),
verify (`fedecg data verify`), partition (simulated hospitals), fetch (download).

Import from the submodules (`from common.data.dataset import load_dataset`); this package imports nothing
heavy so that `import common.data.partition` stays cheap.
"""
