"""Speed reports for fastmem: `python bench/throughput.py --help`."""
