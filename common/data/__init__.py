"""PTB-XL data layer, one job per module.

metadata (tables, validation), labels (SCP statements, superclasses), demographics, leads (lead algebra),
records (WFDB reading), cache (preprocessed arrays on disk), dataset (ECGDataset, load_dataset),
verify (`fedecg data verify`), fetch (download). Simulated hospitals: partition (make_partition and
its checks) over partition_types (the Partition record), partition_schemes (site, iid, Dirichlet, age) and
patient_choice (one record per patient).

Import from the submodules (`from common.data.dataset import load_dataset`); this package imports nothing
heavy so that `import common.data.partition` stays cheap.
"""
