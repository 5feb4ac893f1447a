"""Measurement drivers above convert: tables that build several files and measure them in one run."""
