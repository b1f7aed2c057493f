"""The application shell: command line, run folders, checkpoints, model sources, errors and seeding."""
