"""Data: the demo data set and ImageNet-layout folders."""
