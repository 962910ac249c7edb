"""Prediction: one slide in, one ``SlideResult`` out (``inference``); the batch driver
over an output directory (``batch``) with its journal and manifest (``journal``) and
one-writer lock (``dirlock``); the Dask runner (``cluster``)."""
