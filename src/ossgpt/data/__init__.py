"""Training data: turning text files into token shards (`prepare`) and fetching public corpora (`download`)."""
