class TVMDecoder:  # placeholder until decode lands
    pass
