"""fedecg's shared core: config, data, model, training loop, privacy, bundles, evaluation."""

import warnings

# wfdb 4.3 calls a pandas API that pandas 3 deprecates at import time; the warning is not actionable here.
warnings.filterwarnings("ignore", message=".*inplace keyword.*", module="wfdb")
