"""The floor every other package stands on: settings, typed records, the `ChatModel`
interface and its backends, prompting, embeddings. Imports only `storage` below it."""
