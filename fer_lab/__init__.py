"""fer_lab: a notebook workbench for diversified feature learning in facial expression recognition.

Implements the diversity term of Heidari & Iosifidis ("Learning Diversified Feature
Representations for Facial Expression Recognition in the Wild") on ESR and MA-Net,
with datasets, one training engine, run directories and figures. Import the parts you
need: ``fer_lab.diversity``, ``fer_lab.models.build_model``, ``fer_lab.data.build_dataset``,
``fer_lab.train.train``, ``fer_lab.runs.load_run``, ``fer_lab.viz``.
"""
__version__ = "0.1.0"
