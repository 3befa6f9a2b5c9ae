"""One module per op family: input validation, backend choice and autograd."""
