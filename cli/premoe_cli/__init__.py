"""premoe command-line front end (installed as `premoe_cli`, console script `premoe`)."""
