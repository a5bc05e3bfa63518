"""Using a trained model: the model folder, predictions, Grad-CAM and ensembles."""
