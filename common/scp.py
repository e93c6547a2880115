"""The 71 SCP-ECG statements of PTB-XL, in the order of the official scp_statements.csv.

A public constant, so that a server or a released bundle can name labels without any data at hand.
The data layer checks every scp_statements.csv it reads against it.
"""

SCP_CODES: tuple[str, ...] = (
    'NDT', 'NST_', 'DIG', 'LNGQT', 'NORM', 'IMI', 'ASMI', 'LVH', 'LAFB', 'ISC_', 'IRBBB', '1AVB',
    'IVCD', 'ISCAL', 'CRBBB', 'CLBBB', 'ILMI', 'LAO/LAE', 'AMI', 'ALMI', 'ISCIN', 'INJAS', 'LMI',
    'ISCIL', 'LPFB', 'ISCAS', 'INJAL', 'ISCLA', 'RVH', 'ANEUR', 'RAO/RAE', 'EL', 'WPW', 'ILBBB',
    'IPLMI', 'ISCAN', 'IPMI', 'SEHYP', 'INJIN', 'INJLA', 'PMI', '3AVB', 'INJIL', '2AVB', 'ABQRS',
    'PVC', 'STD_', 'VCLVH', 'QWAVE', 'LOWT', 'NT_', 'PAC', 'LPR', 'INVT', 'LVOLT', 'HVOLT', 'TAB_',
    'STE_', 'PRC(S)', 'SR', 'AFIB', 'STACH', 'SARRH', 'SBRAD', 'PACE', 'SVARR', 'BIGU', 'AFLT',
    'SVTAC', 'PSVT', 'TRIGU',
)
assert len(SCP_CODES) == 71
