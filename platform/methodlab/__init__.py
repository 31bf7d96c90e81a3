"""methodlab: train five published vision methods on Ray, track them in MLflow, ship the models.

Importing the package is cheap: ray, torch and mlflow are imported by the modules that need them.
"""

__version__ = "0.1.0"
