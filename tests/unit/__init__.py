"""In process, no mount, no subprocess: each module, store and protocol on its own."""
