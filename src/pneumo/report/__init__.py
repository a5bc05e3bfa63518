"""Reading a finished run: the offline HTML page and the top-losses interpretation."""
