from gridserve.cli.main import app

app()
