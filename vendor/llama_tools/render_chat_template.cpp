// render_chat_template: render chat requests through llama.cpp's own chat-template code, exactly as
// llama-server's /apply-template does (tools/server/server-common.cpp, oaicompat_chat_params_parse, with
// the server's defaults: --jinja, reasoning format "deepseek", thinking on when the template supports it).
//
// stdin: {"gguf": PATH} (the template, BOS/EOS and add_bos of the model, read vocabulary-only) or
//        {"template": TEXT, "bos_token": S, "eos_token": S}, plus "requests": [{"messages": [...],
//        "tools": [...], "add_generation_prompt": bool, "chat_template_kwargs": {...}}, ...].
// stdout: {"supports_thinking": bool, "caps": {...}, "results": [{"prompt": S} | {"error": S}, ...]}.
// A template that cannot be parsed: {"parse_error": S} on stdout and exit status 3.
#include "chat.h"
#include "common.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "llama.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>

static common_chat_templates_inputs request_inputs(const common_json & body, const common_chat_templates * tmpls,
                                                   bool default_thinking) {
    auto caps = common_chat_templates_get_caps(tmpls);
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(body.at("messages"));
    inputs.tools    = common_chat_tools_parse_oaicompat(body.value("tools", common_json()));
    inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(body.value("tool_choice", std::string("auto")));
    inputs.use_jinja = true;
    inputs.parallel_tool_calls   = body.value("parallel_tool_calls", (bool) caps["supports_parallel_tool_calls"]);
    inputs.add_generation_prompt = body.value("add_generation_prompt", true);
    inputs.reasoning_format      = COMMON_REASONING_FORMAT_DEEPSEEK;
    inputs.enable_thinking       = default_thinking;
    if (body.contains("chat_template_kwargs")) {
        for (const auto & [key, value] : body.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[key] = value.dump();
        }
    }
    auto thinking = inputs.chat_template_kwargs.find("enable_thinking");
    if (thinking != inputs.chat_template_kwargs.end()) {
        if (thinking->second == "true") {
            inputs.enable_thinking = true;
        } else if (thinking->second == "false") {
            inputs.enable_thinking = false;
        }
    }
    return inputs;
}

// Why a template does not parse: common_chat_templates_init logs the parser's message and rethrows a copy
// sliced to std::exception, so the template is parsed once more here to get the message itself.
static std::string parse_problem(const std::string & source, const std::exception & fallback) {
    try {
        jinja::lexer lexer;
        auto tokens = lexer.tokenize(source);
        jinja::parse_from_tokens(tokens);
    } catch (const std::exception & e) {
        return e.what();
    }
    return fallback.what();
}

int main() {
    std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    common_json input = common_json::parse(text);
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();

    llama_model * model = nullptr;
    std::string   override_template;
    if (input.contains("gguf")) {
        auto params       = llama_model_default_params();
        params.vocab_only = true;
        model             = llama_model_load_from_file(input.at("gguf").get<std::string>().c_str(), params);
        if (model == nullptr) {
            std::cerr << "cannot load " << input.at("gguf").get<std::string>() << "\n";
            return 2;
        }
    } else {
        override_template = input.at("template").get<std::string>();
    }

    common_json output = common_json::object();
    common_chat_templates_ptr tmpls;
    try {
        tmpls = common_chat_templates_init(model, override_template, input.value("bos_token", std::string()),
                                           input.value("eos_token", std::string()));
    } catch (const std::exception & e) {
        const char * embedded = model != nullptr ? llama_model_chat_template(model, nullptr) : nullptr;
        output["parse_error"] = parse_problem(embedded != nullptr ? std::string(embedded) : override_template, e);
        std::cout << output.dump() << std::endl;
        return 3;
    }
    bool thinking = false;
    try {
        thinking = common_chat_templates_support_enable_thinking(tmpls.get());
    } catch (const std::exception &) {
        thinking = false;
    }
    common_json caps = common_json::object();
    for (const auto & [name, value] : common_chat_templates_get_caps(tmpls.get())) {
        caps[name] = value;
    }
    output["supports_thinking"] = thinking;
    output["caps"]              = caps;
    output["source"]            = common_chat_templates_source(tmpls.get());
    common_json results         = common_json::array();
    const auto & requests = input.at("requests");
    for (size_t i = 0; i < requests.size(); i++) {
        common_json result = common_json::object();
        try {
            auto params      = common_chat_templates_apply(tmpls.get(), request_inputs(requests.at(i), tmpls.get(), thinking));
            result["prompt"] = params.prompt;
        } catch (const std::exception & e) {
            result["error"] = std::string(e.what());
        }
        results.push_back(result);
    }
    output["results"] = results;
    std::cout << output.dump() << std::endl;
    if (model != nullptr) {
        llama_model_free(model);
    }
    llama_backend_free();
    return 0;
}
