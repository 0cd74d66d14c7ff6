"""Shared configuration models, errors and small types."""
