"""The site's own last word on what leaves it: the wire-contract enforcer, tensor-group allow-lists and the
differential-privacy filter with its accountant. Depends only on NVFlare, NumPy and fedopal.specs, so that a hospital
can review it alone; it is installed with the runtime wheel and named in the site's local/privacy.json."""
