"""What runs at a hospital: the FLARE site script and its executor, local training (plain and DP-SGD), data readers
and validation, the site's own state, exports, predict and late join."""
