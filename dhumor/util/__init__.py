"""Small helpers with no dhumor dependencies: long paths, atomic files."""
