"""Training data: turning text files into a prepared data folder (prepare.py, `ossgpt prepare`), the token files in
it (tokens.py), and fetching public corpora (download.py)."""
