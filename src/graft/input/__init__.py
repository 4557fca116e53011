"""Images in: folders and CSVs read into a checked split, files decoded, preprocessing, batches."""
