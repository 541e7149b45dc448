"""Placeholder handler: every function overlays its own handler folder here."""


def handle(event, context):
    return {"statusCode": 200, "body": "customscripts python3-http template\n"}
