"""Lightning-free, pure-torch operations: box coding, assignment, post-processing, DDP collectives."""
