"""The application: tasks, the comparison, the train/eval CLI, the trainer, metrics and plots.

The library (``functional``, ``distributions``, ``nn``, ``infer``, ``models``, ``data``) never
imports this package; this package may import tqdm, matplotlib and scipy.
"""
