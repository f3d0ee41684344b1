"""Beyond one call: dataset-scale batch segmentation."""
