"""Beam side of semjpeg: IO, DoFns, model handlers and composite PTransforms."""
